"""Online progress of a new video from Python, with a model exported by `alignprog export`.

    python examples/python_api.py EXPORT_DIR VIDEO.npy [START:END ...]

VIDEO.npy holds the video's features, (T, D) float16/float32 as `alignprog extract-features`
writes them. Each START:END (inclusive frame indices) is one action; without any, the whole
video is one action. Prints the progress of every frame: what a live system would show, each
frame seeing only its action's frames so far (background frames are 0).
"""

import sys

import numpy as np

import alignprog
from alignprog.data import VideoAnnotation
from alignprog.inference import predict_progress

if len(sys.argv) < 3 or not all(a.count(":") == 1 for a in sys.argv[3:]):
    sys.exit("usage: " + __doc__.strip().splitlines()[2].strip())
export_dir, video, *actions = sys.argv[1:]
model = alignprog.load(export_dir)                          # eval mode, on the CPU
features = np.load(video)                                   # (T, D)
spans = [tuple(int(x) for x in a.split(":")) for a in actions] or [(0, len(features) - 1)]
annotation = VideoAnnotation(task="-", handle="video", num_frames=len(features),
                             labels=tuple(f"action{i}" for i in range(len(spans))),
                             starts=tuple(s for s, _ in spans), ends=tuple(e for _, e in spans),
                             background=frozenset())
progress = predict_progress(model, features, annotation)   # (T,) in [0, 1]
for t, p in enumerate(progress):
    print(f"frame {t:5d}  progress {p:.3f}")
