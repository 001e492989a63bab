"""EMBEDPOOL_DATABASE_URL: the server uses the given Postgres and starts no embedded one of its own."""

from __future__ import annotations

from pathlib import Path

import grpc
import psycopg

from embedpool.store.embedded import EmbeddedPostgres
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, serving


def test_database_url_points_at_another_postgres(tmp_path: Path, make_settings: SettingsFactory) -> None:
    with EmbeddedPostgres(tmp_path / "external") as external:
        settings = make_settings(tmp_path / "data", database_url=external.uri)
        with serving(settings) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EmbedderStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(name="elsewhere"))
            stub.Embed(pb.EmbedRequest(collection="elsewhere", documents=[pb.Document(id="a", text="x y")]))
        assert running.database_url == external.uri
        assert not (tmp_path / "data" / "pg").exists()
        with psycopg.connect(external.uri) as conn:
            names = [row[0] for row in conn.execute("SELECT name FROM collections")]
        assert names == ["elsewhere"]
