"""Checkpoint file formats: Hugging Face folders, Meta's original folders and our own, without torch.

    folders.py         load / save of whole folders, the format recognised from its files
    safetensors_io.py  the safetensors file format (memory-mapped reads, bf16 widening, atomic writes)
    pth_io.py          Meta's consolidated.*.pth, read by a restricted unpickler

A training run's folder of checkpoints (weights + optimizer + data position) is a different thing and
lives in llama3np.training.run_folder; `load` reads those too, through it.
"""
from .folders import (DEFAULT_VOCAB_SIZE, FORMATS, args_from_hf_config, args_from_meta_params,
                      hf_config_from_args, hf_to_meta_name, load, meta_to_hf_name, permute_rotary, save,
                      unpermute_rotary)

__all__ = ["DEFAULT_VOCAB_SIZE", "FORMATS", "args_from_hf_config", "args_from_meta_params",
           "hf_config_from_args", "hf_to_meta_name", "load", "meta_to_hf_name", "permute_rotary", "save",
           "unpermute_rotary"]
