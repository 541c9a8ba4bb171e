"""What docs/hpc.md shows that can be checked without a cluster: a SLURM job script
that asks for a GPU and starts a worker advertising the GPU resource over TLS, with the
workers' credentials in private files."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_docs_name_every_route():
    text = (Path(__file__).parents[2] / "docs" / "hpc.md").read_text()
    for needle in ("SLURMCluster", "--resources", "LocalCUDACluster", "dask_gateway",
                   "StageLostError", "RequestTimeoutError", "## Security",
                   "security=cluster.security", "Security.temporary()", "shared login node",
                   "jupyter-server-proxy", "test_gateway_dask_tls.py", "TPMLAB_CLUSTER_CREDENTIALS"):
        assert needle in text
    assert "connect(cluster.scheduler_address)" not in text  # every example attaches with TLS


def test_slurm_job_script_has_the_gpu_resource_and_tls(tmp_path):
    import os
    import stat

    from distributed.security import Security

    jobqueue = pytest.importorskip("dask_jobqueue", reason="dask-jobqueue (the hpc extra) is not installed")
    shared = tmp_path / "tls"
    shared.mkdir(mode=0o700)
    cluster = jobqueue.SLURMCluster(
        queue="gpu", cores=8, processes=1, memory="64GB", walltime="04:00:00",
        job_extra_directives=["--gres=gpu:1"], worker_extra_args=["--resources", "GPU=1"],
        job_script_prologue=["export TPMLAB_HOME=$HOME/.tpmlab"],
        security=Security.temporary(), shared_temp_directory=str(shared),
        scheduler_options={"dashboard_address": "127.0.0.1:0"})
    try:
        script = cluster.job_script()
        address, security = cluster.scheduler_address, cluster.security
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in shared.iterdir()}
        dashboard_host = cluster.scheduler.http_server.address
    finally:
        cluster.close()
    assert "#SBATCH --gres=gpu:1" in script
    assert "--resources GPU=1" in script
    assert "TPMLAB_HOME" in script
    assert address.startswith("tls://") and security.require_encryption
    for flag in ("--tls-ca-file", "--tls-cert", "--tls-key"):
        assert f"{flag} {shared}{os.sep}" in script
    assert len(files) == 3 and set(files.values()) == {0o600}
    assert dashboard_host == "127.0.0.1"  # the login node's other users cannot browse it
