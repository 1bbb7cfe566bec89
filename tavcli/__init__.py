"""tavcli: Tune-A-Video as a command-line tool and a library.

The public library API lives in submodules (imported on demand so `tav --help` stays fast):
`tavcli.video_unet.inflate_unet`, `tavcli.inversion.ddim_inversion`, `tavcli.sampling.ddim_sample`,
`tavcli.workflow` (tune / invert / edit on a project directory) and `tavcli.video`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
