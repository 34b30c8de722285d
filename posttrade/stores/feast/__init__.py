"""Feast: the feature store feast_pipeline writes and serves from.

* `repo`    — the Feast feature repository built from `posttrade.features.views`
              (entities, push sources, Parquet sources, feature views; the CLI config).
* `online`  — Valkey/Redis rows in exactly Feast's Redis layout, one pipelined round
              trip per batch (Feast reads them with `get_online_features`).
* `offline` — Parquet part files per view: the offline store Feast reads through its
              DuckDB offline store.
* `store`   — `FeatureRepository`: applies the repository, writes online (Feast's own
              path) and offline, materializes, reads online features, builds training sets.
* `client`  — `FeastClient`: the repository and the online writer of a running service;
              `FeastSettings`: where the repository lives, which online store it uses.
* `sink`    — the sinks every write goes through (`FeastPushSink`, `FeastRegistrySink`).
* `status`  — what `/features/status` and the feature metrics say, per view.

`client`, `sink` and `status` import without the `features` extra (a service is built
before it starts); the others need it (Feast, mmh3) and are loaded when the service starts.
"""
