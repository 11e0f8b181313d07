"""Exceptions raised by the codec. Every failure to decode is one of these, never wrong pixels."""


class LVPNetError(Exception):
    """Base class of every error the codec raises on purpose."""


class CorruptStreamError(LVPNetError):
    """The stream is damaged: truncated, bad magic, CRC or checksum mismatch, inconsistent sizes."""


class UnsupportedStreamError(LVPNetError):
    """The stream is intact but this reader cannot decode it (unknown version, model or coder)."""


class UnsupportedInputError(LVPNetError):
    """The array given to `compress` is outside the codec's scope (dtype, shape, size limit)."""


class WeightsError(LVPNetError):
    """Model weights are missing or do not match their recorded SHA-256."""
