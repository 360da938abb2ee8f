"""Reference decoder models (Gemma-2-style and GPT-2-style) and their configs."""
from vaultkern.models.configs import DecoderConfig, config_names, get_config, make_config
from vaultkern.models.decoder import (Decoder, GemmaRMSNorm, IGNORE_INDEX, count_parameters,
                                      per_sequence_loss)

__all__ = ["Decoder", "DecoderConfig", "GemmaRMSNorm", "IGNORE_INDEX", "config_names",
           "count_parameters", "get_config", "make_config", "per_sequence_loss"]
