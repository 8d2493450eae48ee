"""samtune: adapt Segment Anything to your domain."""

import os

# albumentations asks PyPI for a newer version when it is imported, synchronously, with a 2 s timeout, in every
# process that imports it (DataLoader workers, DDP ranks, sweep jobs); on an offline GPU node each import waited for
# a failed name lookup and printed a warning. Set NO_ALBUMENTATIONS_UPDATE=0 to have the check back.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
