"""Training settings read by tools/lazyconfig_train_net.py (Detectron2's common/train.py keys)."""

train = dict(
    output_dir="./output",
    init_checkpoint="",
    max_iter=12 * 7330,
    amp=dict(enabled=False),  # GPU mixed precision; CPU: bfloat16 autocast where native
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=7330, max_to_keep=100),
    eval_period=0,  # evaluation at the end only
    log_period=20,
    device="cuda",
    seed=-1,
)
