"""Clients for the project's stores; import the module you need (they pull in
different heavy dependencies):

* `posttrade.stores.questdb`    — `QuestDBClient` (SQL over HTTP), `QuestDBWriter` (ILP/HTTP batches)
* `posttrade.stores.clickhouse` — `open_clickhouse` → `ClickHouseStore` (embedded chdb or a server)
* `posttrade.stores.valkey`     — `open_valkey` → `ValkeyStore`
* `posttrade.stores.objects`    — `open_object_store` → `LocalObjectStore` | `S3ObjectStore`

Every store has `async ping()` (True or raises; for `/health`) and `async close()`.
Blocking libraries run in threads: each async method that would block has a
`<name>_sync` twin, safe to call from any thread, that does the work.
"""
