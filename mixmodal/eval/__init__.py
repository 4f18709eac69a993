"""Evaluation: metrics (image_metrics: PSNR, SSIM) and, later, the eval harness."""
