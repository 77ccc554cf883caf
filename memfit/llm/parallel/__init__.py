"""Tensor-parallel inference over torch.distributed: group.py (ranks, collectives, failure), launch.py (spawn or
torchrun), shard.py (load one rank's slice, join the shards), mirror.py (rank 0's steps on every rank),
worker.py (a worker's loop), rank.py (this process's part, as LLMEngine.__init__ wires it). See docs/parallel.md."""
