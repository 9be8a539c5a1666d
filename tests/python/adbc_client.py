"""A stock Flight SQL client against hedf: the ADBC Flight SQL driver and pyarrow from PyPI.

Run by tests/it/adbc.rs with: grpc+tls://HOST:PORT HEDF_BINARY WORK_DIR CSV CA_PEM. The hedf
CLI encrypts and decrypts;
ADBC only moves ciphertext. Expected sums come from the CSV through Python's decimal module,
independently of hedf and DataFusion.
"""

import csv
import subprocess
import sys
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.parquet as pq

url, hedf, work, source, ca = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5]
root_certs = Path(ca).read_text()
years = ["2018", "2019", "2020", "2021", "2022"]


def run(*args):
    return subprocess.run([hedf, *args], check=True, capture_output=True, text=True).stdout


def connect(user, password, uri=url):
    return flightsql.connect(
        uri,
        db_kwargs={
            "username": user,
            "password": password,
            "adbc.flight.sql.client_option.tls_root_certs": root_certs,
        },
        autocommit=True,
    )


keys = work / "keys"
run("keygen", "--out", str(keys))
encrypted = work / "population.parquet"
run("encrypt", source, "--key", str(keys), "--measures", ",".join(years), "--scale", "1",
    "--out", str(encrypted))

with connect("alice", "alice-secret") as conn:
    table = pq.read_table(encrypted)
    with conn.cursor() as cur:
        rows = cur.adbc_ingest("population", table, mode="create")
        assert rows == 152, rows

        # Plain SUM, as any SQL client writes it: on encrypted columns the server runs he_sum.
        sums = ", ".join(f'SUM("{y}") AS "{y}"' for y in years)
        cur.execute(
            f'SELECT "AREA", "SEX", {sums} FROM population GROUP BY "AREA", "SEX" '
            'ORDER BY "AREA", "SEX"'
        )
        result = cur.fetch_arrow_table()

        # What needs plaintext is refused at planning with hedf's message, not DataFusion's,
        # and the message says where it runs: in a hedf client, which finishes on the sums.
        refused = {
            'SELECT "SEX", AVG("2018") FROM population GROUP BY "SEX"':
                "2018 is encrypted: AVG needs its plaintext",
            'SELECT "SEX", ROUND(AVG("2018"), 1) FROM population GROUP BY "SEX"':
                "2018 is encrypted: AVG needs its plaintext",
            'SELECT "AREA", SUM("2018") AS t FROM population GROUP BY "AREA" '
            'ORDER BY t DESC LIMIT 10':
                "t is encrypted and cannot be ordered by on the server",
            'SELECT "AREA" FROM population GROUP BY "AREA" HAVING SUM("2018") > 1000':
                "is encrypted: `>` needs its plaintext",
            'SELECT "AREA", SUM("2019") - SUM("2018") FROM population GROUP BY "AREA"':
                "is encrypted: `-` needs its plaintext",
            'SELECT "AREA", SUM("2018") / COUNT(*) FROM population GROUP BY "AREA"':
                "is encrypted: `/` needs its plaintext",
            'SELECT "SEX", SUM("2018") * 100.0 / SUM(SUM("2018")) OVER () '
            'FROM population GROUP BY "SEX"':
                "is encrypted",
        }
        for sql, message in refused.items():
            try:
                cur.execute(sql)
                cur.fetch_arrow_table()
                raise AssertionError(f"accepted on ciphertext: {sql}")
            except adbc_driver_manager.Error as e:
                assert message in str(e), (sql, e)
                assert "a hedf client (hedf sql" in str(e), (sql, e)
                assert "bug" not in str(e), (sql, e)
    assert result.num_rows == 8, result.num_rows
    assert result.schema.field("2018").metadata[b"hedf.kind"] == b"sum"
    path = work / "result.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, result.schema) as writer:
        writer.write_table(result)

    objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
    tables = [
        (t["table_name"], [c["column_name"] for c in t["table_columns"] or []])
        for cat in objects
        for schema in cat["catalog_db_schemas"] or []
        for t in schema["db_schema_tables"] or []
    ]
    assert ("population", ["AREA", "AGE GROUP", "SEX", *years]) in tables, tables

decrypted = list(csv.DictReader(run("decrypt", str(path), "--key", str(keys), "--format", "csv").splitlines()))
expected = defaultdict(lambda: [Decimal(0)] * len(years))
with open(source, newline="") as f:
    for row in csv.DictReader(f):
        acc = expected[(row["AREA"], row["SEX"])]
        for i, y in enumerate(years):
            acc[i] += Decimal(row[y])
assert len(decrypted) == len(expected) == 8
for row in decrypted:
    got = [Decimal(row[y]) for y in years]
    assert got == expected[(row["AREA"], row["SEX"])], (row, expected[(row["AREA"], row["SEX"])])

try:
    with connect("alice", "wrong-password") as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    raise AssertionError("a wrong password was accepted")
except adbc_driver_manager.Error as e:
    assert "UNAUTHENTICATED" in str(e).upper() or "PASSWORD" in str(e).upper(), e

# A plaintext client gets no answer from the TLS server.
try:
    with connect("alice", "alice-secret", url.replace("grpc+tls://", "grpc://")) as conn, \
            conn.cursor() as cur:
        cur.execute("SELECT 1")
    raise AssertionError("a plaintext client was answered by a TLS server")
except adbc_driver_manager.Error:
    pass

print(f"adbc: ingested 152 rows, {len(decrypted)} decrypted groups equal the plaintext sums")
