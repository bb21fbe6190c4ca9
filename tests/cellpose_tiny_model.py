"""Train a small cellpose 3 model from scratch on synthetic cells and save it: "the user's model" of the tests.

Run in the cellpose environment of .ci/setup-cellpose (cellpose cannot build a model here otherwise:
cellpose 4 needs downloaded weights). ``python cellpose_tiny_model.py OUT_FOLDER EPOCHS`` prints the
model file's path on its last line.
"""

import sys

import numpy as np
import torch
from cellpose import models, train
from scipy import ndimage as ndi

from tem_ij_plugin.synthetic import make_tem_image


def main(folder: str, epochs: int) -> None:
    torch.manual_seed(0)
    images, masks = [], []
    for seed in range(4):
        image, truth = make_tem_image(256, 256, seed=seed, cell_radius=30)
        images.append(image.astype(np.float32))
        masks.append(ndi.label(truth == 1)[0])
    net = models.CellposeModel(gpu=False, pretrained_model=False, diam_mean=30.0).net
    path = train.train_seg(
        net, train_data=images, train_labels=masks, channels=[0, 0], n_epochs=epochs, batch_size=4,
        bsize=128, learning_rate=0.1, save_path=folder, model_name="tiny_cellpose", min_train_masks=1,
    )[0]  # fmt: skip
    print(path)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
