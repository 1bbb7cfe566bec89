"""The method (docs/method.md): the video UNet, tuning, inversion, sampling, windows, low-rank tunes,
the VAE, control, metrics and memory estimates."""
