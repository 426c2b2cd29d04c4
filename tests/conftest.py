import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch

# Tiny models on a small shared CPU: one intra-op thread is many times faster
# than two threads fighting another process for the cores.
torch.set_num_threads(1)


def read_local_table(results, table: str, sweep: str = "local"):
    """Every row a `local_context(results)` run wrote to `table`, as a DataFrame."""
    return pq.read_table(os.path.join(results, sweep, table)).to_pandas()


def keep_every_checkpoint(ctx, copies: dict, directory) -> None:
    """Make a `local_context` also copy each reported checkpoint to directory/ckpt-<step>
    (into copies[step]); it keeps only the latest itself."""
    forward = ctx.report_fn

    def report_fn(metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            copies[metrics["step"]] = shutil.copytree(checkpoint_dir, os.path.join(directory, f"ckpt-{metrics['step']}"))
        forward(metrics, checkpoint_dir)

    ctx.report_fn = report_fn


@pytest.fixture
def hub_assumed_reachable():
    """For tests of how configs translate, not of whether MNIST or t5-base can be
    downloaded here (that is tests/test_bad_input.py's job)."""
    from workloads.core.availability import hub_assumed_reachable as assumed

    with assumed():
        yield
