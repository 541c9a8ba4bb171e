"""tpmlab on JupyterHub: the configuration an administrator adds to ``jupyterhub_config.py``
(:mod:`.config`, ``tpmlab hub-config``)."""
