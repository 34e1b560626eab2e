"""Every patch of megatron-core and every touch of DeepSpeed's private API, in one place, each
written against one pinned version, refusing any other, and tested."""


def require_version(package: str, found: str, supported: str, what: str) -> None:
    """Refuse to patch a version the patches were not written for."""
    if found != supported:
        raise RuntimeError(f"megatron_hypermoe's {what}: written for {package}=={supported}, "
                           f"found {found}; pip install {package}=={supported}")
