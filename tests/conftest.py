"""Test-wide settings: wandb offline, no hub access, one CPU thread per test process."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Bitwise-reproducible MKL GEMMs whatever the operands' alignment (strict CNR mode; read at
# MKL's first call, and inherited by every process a test starts): the exact-equality tests
# (resume, validation == sample) must not hang on the CPU model of the machine they run on.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


@pytest.fixture(autouse=True)
def _one_thread():
    """Several processes share two cores: one intra-op thread each is fast and predictable
    (two OpenMP threads per process spin against each other and run tiny models ~20x
    slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (moto) on 127.0.0.1 for the whole session, reached through the usual
    AWS environment variables, which this fixture sets and restores; stopped by PID."""
    from tests.support.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3") / "server.log").start()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env().items():
            patch.setenv(name, value)
        try:
            yield server
        finally:
            server.stop()
