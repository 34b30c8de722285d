"""The Feast push sinks on Feast's SQLite online store and the offline parts: two writers of
one view reach the online store in the order their rows were computed, an attempt after
the online write succeeded writes offline only, and rows that can never be written are
refused at once."""

from __future__ import annotations

import asyncio
import shutil
import uuid

import pytest
from prometheus_client import CollectorRegistry

from posttrade.features.views import ACCOUNT_ORDER_FEATURES
from posttrade.sinks import RetryPolicy, SinkRefused
from posttrade.stores.feast.client import FeastClient, FeastSettings
from posttrade.stores.feast.sink import FeastPushSink, Turns
from posttrade.stores.feast.status import FeatureStatus

pytestmark = [
    pytest.mark.filterwarnings("ignore:fetch_arrow_table:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Discarding nonzero nanoseconds:UserWarning"),
]

S = 1_000_000_000
T = 1_763_800_020 * S
VIEW = ACCOUNT_ORDER_FEATURES  # fill_rate_today, orders_today, ordered_qty_today, filled_qty_today
FAST = RetryPolicy(attempts=2, initial_s=0.05, max_s=0.1)


@pytest.fixture
async def feast(tmp_path):
    from posttrade.stores.feast.store import FeatureRepository

    repository = FeatureRepository(FeastSettings(project=f"s{uuid.uuid4().hex[:8]}", data_dir=tmp_path, online_store="sqlite"))
    await asyncio.to_thread(repository.apply)
    client = FeastClient()
    await client.open(repository)
    yield client
    await client.close()


async def orders_today(feast: FeastClient, account: str) -> int:
    [values] = await feast.online_features("account", [account], [f"{VIEW.name}:orders_today"])
    return values[f"{VIEW.name}:orders_today"]


async def test_two_writers_of_a_view_write_online_in_the_order_their_rows_were_added(feast):
    status = FeatureStatus(CollectorRegistry())
    turns = Turns()
    positions = FeastPushSink(VIEW, feast, status, FAST, writer="positions", turns=turns)
    orders = FeastPushSink(VIEW, feast, status, FAST, writer="orders", turns=turns)
    positions.extend([("ACC1", T, 0.5, 1, 10.0, 5.0)])  # computed first
    orders.extend([("ACC1", T + 1_000, 0.25, 2, 20.0, 5.0)])  # then the newer state
    later = asyncio.create_task(orders.flush())
    await asyncio.sleep(0.3)
    assert not later.done()  # waits for the positions agent's turn
    await positions.flush()
    await asyncio.wait_for(later, 10)
    assert await orders_today(feast, "ACC1") == 2  # the newest state is the one online
    assert status[VIEW.name].rows_pushed == 2 and status[VIEW.name].pushes == 2

    # A writer whose batch crashed gives up its turn: the other one is not held up.
    positions.extend([("ACC1", T + 2_000, 0.1, 3, 30.0, 3.0)])
    orders.extend([("ACC1", T + 3_000, 0.2, 4, 40.0, 8.0)])
    positions.discard()
    await asyncio.wait_for(orders.flush(), 10)
    assert await orders_today(feast, "ACC1") == 4


async def test_a_retry_after_the_online_write_writes_offline_only(feast):
    status = FeatureStatus(CollectorRegistry())
    sink = FeastPushSink(VIEW, feast, status, FAST, writer="orders")
    offline = feast.repository.offline.directory(VIEW)
    shutil.rmtree(offline)
    offline.write_text("in the way")  # the view's directory cannot be made: the offline write fails
    sink.extend([("ACC2", T, 0.5, 1, 10.0, 5.0)])
    flush = asyncio.create_task(sink.flush())
    await asyncio.sleep(0.5)
    view = status[VIEW.name]
    assert not flush.done() and view.errors >= 2 and "FileExistsError" in view.last_error
    offline.unlink()  # the disk is fine again
    await asyncio.wait_for(flush, 10)
    assert view.entities_written_online == 1  # written online once, whatever the retries
    assert view.rows_pushed == 1 and feast.repository.offline.read(VIEW).num_rows == 1
    assert await orders_today(feast, "ACC2") == 1


async def test_rows_that_can_never_be_written_are_refused_at_once(feast):
    status = FeatureStatus(CollectorRegistry())
    sink = FeastPushSink(VIEW, feast, status, FAST, writer="orders")
    sink.extend([("ACC3", T, 0.5)])  # three features missing
    with pytest.raises(SinkRefused, match=VIEW.name):
        await sink.flush()
    assert sink.stats.refused == 1 and status[VIEW.name].errors == 0
    assert sink.pending == 1  # kept: the agent's crash discards it, the batch comes again
