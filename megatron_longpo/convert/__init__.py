"""HF <-> Megatron checkpoint conversion for the families of architectures.py (see docs/convert.md)."""

from megatron_longpo.convert.hf_config import SUPPORTED_ARCHITECTURES, ConversionError
from megatron_longpo.convert.hf_to_megatron import ImportResult, VerificationError, convert_hf_to_megatron
from megatron_longpo.convert.megatron_to_hf import ExportResult, convert_megatron_to_hf

__all__ = [
    "SUPPORTED_ARCHITECTURES", "ConversionError", "ExportResult", "ImportResult", "VerificationError",
    "convert_hf_to_megatron", "convert_megatron_to_hf",
]
