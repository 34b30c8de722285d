"""ML features: what feast_pipeline computes and how it reaches Feast.

* `views`   — the feature views as plain data (names, entities, features, types, TTLs):
              the single list every other module reads. No Feast import.
* `math`    — the feature arithmetic, pure and synchronous (windows' values, returns,
              volatility, VWAP, spread, order-flow imbalance, account exposure).
* `repo`    — the Feast feature repository built from `views` (entities `symbol` and
              `account`, push sources, Parquet sources, feature views). Imports Feast.
* `online`  — a Valkey/Redis writer that stores rows in exactly Feast's Redis layout,
              one pipelined round trip per batch (Feast reads them with
              `get_online_features`).
* `offline` — Parquet part files per view: the offline store Feast reads through its
              DuckDB offline store.
* `store`   — `FeatureRepository`: applies the repository, pushes rows online and
              offline, materializes, reads online features, builds training sets.
* `batch`   — the batch-computed (hourly) view, computed from the offline store.

Only `views` and `math` may be imported without Feast installed: the service imports the
rest when it starts.
"""
