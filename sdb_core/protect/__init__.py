"""Protection: the box, its key, the SDB and Nasty Teacher recipes."""
from .box import NoKeyError, SafeDistillationBox
from .key import SealError, blend, generate_key, load_or_create_master_key, random_keys, seal, unseal
from .nasty import NastyConfig, wrap_nasty
from .sdb import SDBConfig, WrapResult, confusion_targets, wrap

__all__ = ["NoKeyError", "SafeDistillationBox", "SealError", "blend", "generate_key",
           "load_or_create_master_key", "random_keys", "seal", "unseal", "NastyConfig", "wrap_nasty",
           "SDBConfig", "WrapResult", "confusion_targets", "wrap"]
