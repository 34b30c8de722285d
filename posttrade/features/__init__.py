"""ML features: what feast_pipeline computes, pure and synchronous.

* `views` — the feature views as plain data (names, entities, features, types, TTLs):
            the single list every other module reads.
* `math`  — the feature arithmetic (windows' values, returns, volatility, VWAP, spread,
            order-flow imbalance, account exposure, fill counts).
* `batch` — the batch-computed (hourly) view's rows, from the offline minute rows.

The stream agents that compute them are in `posttrade.agents.features`; how the rows
reach Feast (its online and offline stores, the repository) is `posttrade.stores.feast`.
Nothing here imports Feast.
"""
