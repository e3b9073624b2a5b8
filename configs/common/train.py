"""Training options read by tools/train_net.py (Detectron2's ``train`` dict plus our extras)."""
train = dict(
    output_dir="./output",
    init_checkpoint="",  # weights to start from (fine-tuning) or to evaluate (--eval-only)
    max_iter=90000,
    epochs=None,  # > 0: max_iter from the training set's size (dinov2od.d2.config.epochs_to_iterations)
    device="cuda",  # or "cpu"
    seed=42,  # < 0: random
    amp=dict(enabled=False, precision="float16"),  # or "bfloat16"
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),  # create_ddp_model's
    checkpointer=dict(period=5000, max_to_keep=3),
    eval_period=5000,  # 0: only after training
    eval_after_train=True,
    eval_quantize="",  # --eval-only on the CPU: "int8" (or "int8-backbone") evaluates an int8 copy
    log_period=20,
    accumulate_steps=1,  # micro-batches per optimizer step
    # batch per GPU (None: dataloader.train.total_batch_size is the batch over all GPUs); with
    # effective_batch, accumulate_steps = effective_batch / (images_per_gpu x GPUs), at start-up
    images_per_gpu=None,
    effective_batch=None,  # images per optimizer step (needs images_per_gpu)
    clip_grad=dict(max_norm=0.1, norm_type=2.0),  # the norm of all gradients together; 0 disables
    ema=dict(enabled=False, decay=0.9997, eval_ema=True),  # evaluate the EMA weights
    visualize=dict(num_images=0, score_threshold=0.5),  # prediction drawings after training
    print_loss_curve=0,  # > 0: the run summary prints the training losses at this many iterations
    cudnn_benchmark=False,
)
