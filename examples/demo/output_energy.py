"""How much of each source a fine-tuned separator puts out, and how many of its bins are alive.

The decoupled mask head's magnitude is ``ReLU(|X| sigmoid(m) + q)``: a bin whose argument is
negative outputs silence and passes no gradient. For each checkpoint this prints, per source,
the RMS of the estimate over the RMS of the reference on the first test song (8 s), the fraction
of time-frequency bins whose ReLU is active, and the mean residual ``q``. Used in docs/RESULTS.md's
diagnosis (pretrained arms put out about half the drum energy of scratch arms).

    python examples/demo/output_energy.py exp/demo/midi/finetune/s0/{scratch,pretrained}_n2_s1/checkpoints/checkpoint_best.pt
"""
import argparse
import os

import numpy as np
import soundfile as sf
import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--musdb-root", default="exp/demo/midi/corpus/musdb")
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    import pahubert_plugin  # noqa: F401  (registers the models)
    from fairseq import checkpoint_utils

    torch.set_num_threads(1)
    test = os.path.join(args.musdb_root, "test")
    song = os.path.join(test, sorted(os.listdir(test))[0])
    mix, sr = sf.read(os.path.join(song, "mixture.wav"), dtype="float32")
    n = int(args.seconds * sr)
    mixture = torch.from_numpy(np.ascontiguousarray(mix.T[None, :, :n]))
    for ckpt in args.checkpoints:
        model = checkpoint_utils.load_model_ensemble_and_task([ckpt])[0][0].eval()
        stats = {}

        def hook(head, inputs, _out):
            raw, spec = inputs
            b, _, f, t = raw.shape
            r = raw.float().view(b, head.num_sources, head.channels, 4, f, t)
            pre = spec.abs().unsqueeze(1) * torch.sigmoid(r[:, :, :, 0]) + r[:, :, :, 3]
            stats["alive"] = (pre > 0).float().mean(dim=(0, 2, 3, 4)).tolist()
            stats["q"] = r[:, :, :, 3].mean(dim=(0, 2, 3, 4)).tolist()

        model.mask_head.register_forward_hook(hook)
        with torch.no_grad():
            est = model(mixture)[0].numpy()
        cells = []
        for i, name in enumerate(model.sources):
            ref, _ = sf.read(os.path.join(song, f"{name}.wav"), dtype="float32")
            ratio = np.sqrt((est[i] ** 2).mean()) / max(np.sqrt((ref.T[:, :n] ** 2).mean()), 1e-9)
            cells.append(f"{name} rms {ratio:.2f} alive {stats['alive'][i]:.2f} q {stats['q'][i]:+.2f}")
        print(f"{ckpt}\n    " + " | ".join(cells))


if __name__ == "__main__":
    main()
