"""Training objectives, apart from the model: the model returns predictions, these turn
them into named losses.

    next_token.py   cross-entropy + z-loss over the shared vocabulary, with a per-group breakdown
    diffusion.py    DDPM / rectified-flow schedules as pure functions of t, noising, the loss, samplers
"""
