"""Full scale: the course's ``FunAudioChat`` trained at the released size (docs/full_scale.md, notebook 14).

- :mod:`.packing`: 5 Hz dialogues, first-fit-decreasing packing to a cutoff, the released keyword inputs, and
  the scored-token counts that keep a split batch's objective exact;
- :mod:`.fsdp`: the FSDP2 training step (meta build, activation checkpointing, ``fully_shard`` per block, bf16
  mixed precision, rank-0 broadcast load, gradient accumulation, distributed checkpoints, released export) and
  the release's hyper-parameters;
- :mod:`.lora`: LoRA with peft on the course's modules (regex targets, save, reload, merge to the released layout);
- :mod:`.memory`: memory per GPU for every engine, activations, logits, FLOPs per token, MFU, 5 Hz vs 25 Hz;
- :mod:`.dry_run`: ``python -m fac_mini scale dry-run``, the 2-process gloo proof against one process;
- :mod:`.launch`: ``torchrun ... -m fac_mini.scale.launch``, the same step on a GPU cluster;
- :mod:`.gpu_check`: ``python -m fac_mini.scale.gpu_check``, throughput, MFU and memory measured on one GPU;
- :mod:`.deepspeed`: the same step under DeepSpeed ZeRO-2, the official engine (optional install).

peft is imported only where LoRA is used (it is slow to import); import the submodules by name.
"""
