"""What docs/hpc.md shows that can be checked without a cluster: a SLURM job script
that asks for a GPU and starts a worker advertising the GPU resource."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_docs_name_every_route():
    text = (Path(__file__).parents[2] / "docs" / "hpc.md").read_text()
    for needle in ("SLURMCluster", "--resources", "LocalCUDACluster", "dask_gateway",
                   "StageLostError", "RequestTimeoutError"):
        assert needle in text


def test_slurm_job_script_has_the_gpu_resource():
    jobqueue = pytest.importorskip("dask_jobqueue", reason="dask-jobqueue (the hpc extra) is not installed")
    cluster = jobqueue.SLURMCluster(
        queue="gpu", cores=8, processes=1, memory="64GB", walltime="04:00:00",
        job_extra_directives=["--gres=gpu:1"], worker_extra_args=["--resources", "GPU=1"],
        job_script_prologue=["export TPMLAB_HOME=$HOME/.tpmlab"])
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH --gres=gpu:1" in script
    assert "--resources GPU=1" in script
    assert "TPMLAB_HOME" in script
