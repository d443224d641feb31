#!/usr/bin/env python
"""Change an image: img2img, inpainting (with inpainting models and ordinary ones), outpainting.

    python scripts/img2img.py --image in.png --prompt "a blue circle" --strength 0.6        # img2img
    python scripts/img2img.py --image in.png --mask m.png --prompt "a blue square"          # inpainting
    python scripts/img2img.py --image in.png --outpaint right=64 --prompt "a white background"  # outpainting
    python scripts/img2img.py --image in.png --from-png outputs/00000-1234.png                # the same result again

White in the mask is repainted, black kept (--invert-mask swaps them; --mask-from-alpha takes the image's
transparency as the mask). Pixels outside the blurred mask are the input's, unchanged. The image is resized
to --width x --height (default: its own size, rounded down to a multiple of 8) by --resize-mode. Each PNG
carries its parameters (AUTOMATIC1111's fields: Denoising strength, Mask blur, ...) and --from-png reads them
back; the input image is not stored: give it again with --image.
"""

import sys

from ldm.cli import txt2img


def main(argv=None) -> int:
    return txt2img.main(argv, mode="img2img", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
