"""Offloaded full fine-tuning (`memfit train finetune`): ZeRO-Infinity's and MemAscend's host-memory
designs behind one interface (designs.py), in one harness. See docs/finetune.md."""
