"""tavcli: Tune-A-Video as a command-line tool and a library.

The public library API lives in submodules (imported on demand so `tav --help` stays fast):
`tavcli.method.video_unet.inflate_unet`, `tavcli.method.inversion.ddim_inversion`, `tavcli.method.sampling.ddim_sample`,
`tavcli.workflow` (tune / invert / edit on a project directory) and `tavcli.media.video`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
