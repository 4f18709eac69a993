"""Training: one loop for every task, and the tasks.

    trainer.py          TrainerConfig, Trainer(task, config, run_dir).fit()
    task.py             the Task protocol, TaskBase, OptimizerSpec, DataIterator
    optim.py            AdamW with weight-decay groups, warmup + cosine schedule, clipping
    checkpoint.py       atomic step_NNNNNN/ checkpoints: safetensors weights, optimizer, RNG, trainer state
    metrics.py          RUN/metrics.jsonl and the progress bar
    distributed.py      torchrun: the process group, rank/world size, the few collectives the trainer needs
    run.py              `mixmodal train CONFIG`: the `task:` key -> the task's config and Task
    image_tokenizer.py  the first task: VQ / KL-VAE image tokenizers (image_data.py, patch_gan.py)
"""
