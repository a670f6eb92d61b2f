"""Protection: the box, its key, the SDB and Nasty Teacher recipes.

Names resolve lazily (PEP 562): ``sdb_core.protect.seal`` and the bundle loader must not
pull in torch through this package, or the service's cold start pays seconds for it.
"""
from ..lazy import lazy_getattr

_EXPORTS = {
    "NoKeyError": "box", "SafeDistillationBox": "box",
    "SealError": "seal", "seal": "seal", "unseal": "seal", "load_or_create_master_key": "seal",
    "blend": "key", "generate_key": "key", "random_keys": "key",
    "NastyConfig": "config", "wrap_nasty": "nasty",
    "SDBConfig": "config", "WrapResult": "sdb", "confusion_targets": "sdb", "wrap": "sdb", "train_box": "sdb",
    "CheckConfig": "config", "Thresholds": "config", "WrapRefused": "check",
}
__all__ = [  # noqa: RUF022 - grouped by module, as _EXPORTS
    "NoKeyError", "SafeDistillationBox", "SealError", "seal", "unseal", "load_or_create_master_key",
    "blend", "generate_key", "random_keys", "NastyConfig", "wrap_nasty", "SDBConfig", "WrapResult",
    "confusion_targets", "wrap", "train_box", "CheckConfig", "Thresholds", "WrapRefused",
]
assert set(__all__) == set(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
