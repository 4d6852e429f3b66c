"""How object-store credentials reach the processes that need them: never through Ray.

What a launcher hands to Ray (runtime-env `env_vars`, job metadata, actor and task arguments) is
recorded in Ray's logs and shown by its dashboard, so secrets never go that way. Each process takes its
credentials from its own environment, the AWS SDKs' default chain:
- a local cluster the driver (or the coordinator) starts is made of its children, which inherit the
  environment the command was started with;
- a remote cluster's nodes have them in theirs: a Kubernetes Secret mounted with `envFrom`
  (cluster/k8s), the environment SLURM exports to the job's steps (cluster/slurm), an instance role;
- or a credentials file only the user can read, on a file system the nodes share: its path
  (AWS_SHARED_CREDENTIALS_FILE, with AWS_PROFILE) is not a secret and is what travels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from kitdist.config import ConfigError

# The credentials: they travel together, and only in each node's own environment (the key pair and the
# session token of temporary credentials alike).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# The object store's settings that do travel, to the coordinator's jobs and to the training workers: where
# the store is and where to find the credentials (names and paths), never a secret.
STORAGE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


def secret_values() -> list[str]:
    """The secrets set in this process's environment (to check that none is passed on)."""
    return [os.environ[name] for name in SECRET_ENV if os.environ.get(name)]


def assert_no_secrets(env: dict[str, str], key: str = "environment passed to Ray") -> dict[str, str]:
    """`env` unchanged, or a ConfigError naming `key` when it would carry a credential to Ray."""
    named = sorted(set(env) & set(SECRET_ENV))
    if named:
        raise ConfigError(
            f"{key}: {named[0]} is a credential and is never handed to Ray (its logs and dashboard show "
            "what it is given); the nodes take it from their own environment (see cluster/README.md)",
            key=key,
        )
    copied = sorted(name for name, value in env.items() if value in secret_values())
    if copied:
        raise ConfigError(f"{key}: {copied[0]} holds a credential of this environment; remove it", key=key)
    return env


def passed_on_env(names: Sequence[str], key: str = "environment passed to Ray") -> dict[str, str]:
    """The variables among `names` that are set here, to hand to Ray; ConfigError naming `key` if one
    of them is, or holds, a credential."""
    return assert_no_secrets({name: os.environ[name] for name in names if os.environ.get(name)}, key=key)


def check_credentials_file() -> None:
    """AWS_SHARED_CREDENTIALS_FILE, when set, must exist and be readable by its owner only: its path is
    what travels to the workers, so the file itself is the secret."""
    path = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "")
    if not path:
        return
    try:
        mode = os.stat(os.path.expanduser(path)).st_mode
    except OSError as err:
        raise ConfigError(f"AWS_SHARED_CREDENTIALS_FILE: {path}: {err.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"AWS_SHARED_CREDENTIALS_FILE: {path} can be read by others (mode {mode & 0o777:o}); "
            f"make it yours alone: chmod 600 {path}"
        )
