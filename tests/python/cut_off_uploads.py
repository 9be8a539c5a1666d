"""Uploads cut off by stock clients must leave the table as it was.

Run by tests/it/hostile.rs with: HOST:PORT ENCRYPTED_PARQUET CREATE_CMD APPEND_CMD REPLACE_CMD, where
the *_CMD are hex-encoded Flight SQL CommandStatementIngest descriptors (for a new table
"fresh", and appending to / replacing "population"). Prints one line per scenario.
"""

import os
import signal
import subprocess
import sys
import time

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq

if sys.argv[1] == "--killed":
    # Child: start an upload, send two batches, die.
    addr, stored, command = sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])
    table = pq.read_table(stored)
    client = flight.FlightClient(f"grpc://{addr}")
    token = client.authenticate_basic_token("alice", "alice-secret")
    options = flight.FlightCallOptions(headers=[token])
    writer, _ = client.do_put(flight.FlightDescriptor.for_command(command), table.schema, options)
    for batch in table.to_batches(max_chunksize=19)[:2]:
        writer.write_batch(batch)
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)

addr, stored = sys.argv[1], sys.argv[2]
commands = dict(zip(["create", "append", "replace"], (bytes.fromhex(h) for h in sys.argv[3:6])))
adbc_modes = {"create": ("fresh", "create"), "append": ("population", "append"),
              "replace": ("population", "replace")}
table = pq.read_table(stored)
batches = table.to_batches(max_chunksize=19)
assert len(batches) == 8, len(batches)


def connect(user="alice", password="alice-secret"):
    return flightsql.connect(f"grpc://{addr}", db_kwargs={"username": user, "password": password},
                             autocommit=True)


def state():
    """Rows of population, and whether the table "fresh" exists."""
    with connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM population")
        rows = cur.fetchone()[0]
        try:
            cur.execute("SELECT COUNT(*) FROM fresh")
            cur.fetchall()
            fresh = True
        except adbc_driver_manager.Error:
            fresh = False
    return rows, fresh


def check(what, mode):
    got = state()
    assert got == (152, False), f"{what} {mode}: table changed to {got}"
    print(f"{what} {mode}: unchanged", flush=True)


with connect() as conn, conn.cursor() as cur:
    assert cur.adbc_ingest("population", table, mode="create") == 152
check("initial", "create")


def flight_client():
    client = flight.FlightClient(f"grpc://{addr}")
    token = client.authenticate_basic_token("alice", "alice-secret")
    return client, token


for mode, command in commands.items():
    # The call's deadline passes after two of eight batches.
    client, token = flight_client()
    options = flight.FlightCallOptions(headers=[token], timeout=1.0)
    writer, _ = client.do_put(flight.FlightDescriptor.for_command(command), table.schema, options)
    writer.write_batch(batches[0])
    writer.write_batch(batches[1])
    time.sleep(2.0)
    try:
        for batch in batches[2:]:
            writer.write_batch(batch)
        writer.close()
        raise AssertionError("an upload past its deadline succeeded")
    except (flight.FlightError, pa.ArrowException, OSError):
        pass
    client.close()
    check("pyarrow deadline", mode)

    # The client process is killed with the upload under way (pyarrow has no way to cancel a
    # DoPut; closing or dropping its writer ends the stream normally, i.e. completes it).
    child = subprocess.run([sys.executable, __file__, "--killed", addr, stored, command.hex()])
    assert child.returncode == -signal.SIGKILL, child.returncode
    check("pyarrow killed", mode)

    # ADBC reads a source that fails after two batches.
    def failing():
        yield batches[0]
        yield batches[1]
        raise RuntimeError("the source failed")

    name, adbc_mode = adbc_modes[mode]
    reader = pa.RecordBatchReader.from_batches(table.schema, failing())
    try:
        with connect() as conn, conn.cursor() as cur:
            cur.adbc_ingest(name, reader, mode=adbc_mode)
        raise AssertionError("an ingest whose source failed succeeded")
    except (adbc_driver_manager.Error, RuntimeError, pa.ArrowException):
        pass
    check("adbc failing source", mode)

for user in ["u1", "u22", "u333"]:
    with connect(user, "pw") as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone()[0] == 1
    print(f"adbc login {user}: ok", flush=True)
