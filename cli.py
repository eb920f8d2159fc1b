"""
What the tools (train_shakespeare.py, sample.py, study.py, export_hf.py) share in talking to their user: bad
input stops with one line starting with "error:", the flags' parser says so too, the device a flag names, and
the memory a command will need, estimated and checked before anything is built.
"""

import argparse
import dataclasses
import os

import torch

from crope import GPT


def fail(message):
    """Stop with one clear line (no traceback): for bad input, not for bugs."""
    raise SystemExit(f"error: {message}")


class ArgParser(argparse.ArgumentParser):
    """argparse's parser, with a bad flag reported as one line, like every other bad input."""

    def error(self, message):
        fail(message)


def gives(argv, flag):
    """Whether the command line argv (flags passed through to another tool) gives flag, as '--flag value' or
    '--flag=value'."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def path_text(text):
    """A file or folder flag's value. An empty one is refused: it would silently mean the current folder,
    or the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name a file or folder")
    return text


def resolve_device(name):
    """"auto" (CUDA, then MPS, then the CPU) or a device name that exists here, as a torch.device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    count = torch.cuda.device_count() if device.type == "cuda" else 1  # the CPU and MPS are one device each
    if not available.get(device.type, False) or (device.index or 0) >= count:
        fail(f"--device {name} is not available on this machine")
    return device


def check_memory(need, device, what, advice):
    """Refuse, in one line, what needs more bytes than the device has (a GPU's memory, or this machine's
    for the CPU), before anything is allocated."""
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[1]
    elif device.type == "cpu" and hasattr(os, "sysconf"):
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    if need > have:
        fail(f"{what} needs about {need / 1e9:,.1f} GB, more than the {have / 1e9:,.1f} GB of {device}: {advice}")


def meta_model(config):
    """config's GPT with shapes and no storage (on the meta device): to count parameters or check shapes without the
    memory or the time of a real model."""
    with torch.device("meta"):
        return GPT(config)


# Memory estimates, in bytes, made from a GPTConfig before any model is built: simple counts that err high.

def parameter_count(config):
    """The model's parameters, without building it at its depth: every layer has the same ones, so a model of one
    layer and one of two give the count at any depth."""
    one, two = (sum(p.numel() for p in meta_model(dataclasses.replace(config, n_layer=n)).parameters()) for n in (1, 2))
    return one + (config.n_layer - 1) * (two - one)


def training_bytes(config, batch_size, processes, eval_iters):
    """What one of processes training processes holds: float32 weights, gradients and AdamW's two moments
    (16 bytes a parameter) and rotary tables; the activations its share of the batch keeps for the backward,
    per token and layer about 20 n_embd floats (the LayerNorms' inputs and outputs, q, k, v before and after
    the rotation, the attention output, the MLP's 4 n_embd hidden layer before and after GELU) plus
    n_head * block_size attention scores (PyTorch's math attention keeps them, its fused kernels do not), and
    per token 3 vocab_size floats (the log-softmax kept for the backward, its gradient and the logits'
    gradient); and the eval_iters whole validation batches (int64 inputs and targets). tests/test_runs.py
    compares it with what autograd keeps."""
    c = config
    tokens = batch_size * c.block_size
    per_token = c.n_layer * (20 * c.n_embd + c.n_head * c.block_size) + 3 * c.vocab_size
    activations = 4 * tokens // processes * per_token
    return 16 * parameter_count(c) + 4 * c.block_size * c.head_size + activations + 16 * eval_iters * tokens


def generation_bytes(config, num_samples, tokens):
    """What sampling num_samples sequences of tokens (prompt and new ones) holds: float32 weights and rotary
    tables; the KV cache (keys and values of every layer, sample and position of the context); one forward pass
    over a full context without gradients (one layer's activations at a time: 8 n_embd floats a token, the MLP's
    hidden layer before and after GELU, plus n_head * block_size attention scores), its last position's logits
    and probabilities; and the token ids (int64, twice: each step copies the sequence to add a token)."""
    c = config
    weights = 4 * parameter_count(c) + 4 * c.block_size * c.head_size
    kv_cache = 8 * c.n_layer * num_samples * c.block_size * c.n_embd
    forward = 4 * num_samples * (c.block_size * (8 * c.n_embd + c.n_head * c.block_size) + 2 * c.vocab_size)
    return weights + kv_cache + forward + 16 * num_samples * tokens
