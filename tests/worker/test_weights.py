"""The weights every LVPNet stream names are kept in the object store, and a decoder whose zoo
lacks them (a disaster recovery onto another release) loads them from there, SHA-256 checked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from lvpnet import compress, decompress
from lvpnet.codec import CodecOptions, stream_stats
from lvpnet.errors import UnsupportedStreamError, WeightsError
from lvpnet.model.configs import CONFIGS
from lvpnet.zoo import ZOO, seeded_model
from service.catalog.tables import Instance
from service.config import Settings
from service.db import make_engine, make_session_factory, migrate
from service.ingest import Ingestor
from service.storage.filesystem import FilesystemStore
from tests.archive_support import ct_dataset, part10_bytes
from worker import weights
from worker.pipeline import WorkerContext, archive_instance


@pytest.fixture(autouse=True)
def _no_fallback() -> None:
    ZOO.set_fallback(None)
    yield
    ZOO.set_fallback(None)


def test_archiving_an_lvpnet_object_copies_its_weights_to_the_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    migrate(url)
    settings = Settings(data_dir=tmp_path / "var", database_url=url, codec_candidates="lvpnet")
    factory = make_session_factory(make_engine(url))
    store = FilesystemStore(tmp_path / "store")
    source = tmp_path / "in.dcm"
    source.write_bytes(part10_bytes(ct_dataset(seed=41)))
    result = Ingestor(settings, factory, store, lambda _id: None).ingest_file(source, source="import")
    assert result.instance_id is not None
    assert archive_instance(WorkerContext(settings, factory, store, "worker"), result.instance_id) == "archived"
    with factory() as session:
        assert session.get(Instance, result.instance_id).codec == "lvpnet"  # type: ignore[union-attr]
    default = ZOO.get(None)
    stored = list(store.iter_keys(weights.WEIGHTS_PREFIX))
    assert stored == [weights.weights_key(default.name, default.sha256)]
    assert hashlib.sha256(store.get_bytes(stored[0])).hexdigest() == default.sha256


def test_a_zoo_without_the_weights_decodes_from_the_store(tmp_path: Path) -> None:
    name = "test-disaster-recovery"
    bundle = seeded_model(CONFIGS["lvpnet-ctx"], seed=5, name=name)
    ZOO.register(bundle)
    image = (np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 7 % 4096).astype(np.uint16)
    stream = compress(image, bits_stored=12, model=name, options=CodecOptions(raw_fallback=False))
    assert stream_stats(stream)["planes_model"] > 0  # decoding needs the weights
    store = FilesystemStore(tmp_path / "store")
    weights.ensure_stored(store, name, bundle.sha256)
    weights.ensure_stored(store, name, bundle.sha256)  # known now: not written twice
    ZOO.unregister(name)  # the release that restores the archive does not ship these weights
    with pytest.raises(UnsupportedStreamError):
        decompress(stream)

    weights.use_store(store)
    assert np.array_equal(decompress(stream), image)

    # Weights damaged in the store are refused by their SHA-256, never used
    ZOO.unregister(name)  # forgets the copy loaded from the store too
    other = seeded_model(CONFIGS["lvpnet-ctx"], seed=6, name=name)
    assert other.sha256 != bundle.sha256
    store.put_bytes(weights.weights_key(name, bundle.sha256), other.serialized)
    with pytest.raises(WeightsError):
        decompress(stream)
