"""Speed of neurospec's clustering on the bundled smollm2-135m (30 layers, d_mlp 1536).

Measures: MoEfication of all 30 MLP layers (96 experts each, balanced k-means on the up-projection rows); spectral
clustering (k=16) of the weight graph of one pair of layers (dense, every edge) and of all 46,080 MLP neurons
(sparsified to each node's ``--top-k`` strongest edges per neighbouring layer). Targets on 2 CPU cores: MoEfication
< 60 s and spectral clustering of all MLP neurons < 60 s. Model loading is not timed.

    python benchmarks/cluster_speed.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--experts", type=int, default=96)
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=32, help="edges kept per node and neighbouring layer")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import numpy as np
    import torch

    from neurospec.cluster.moefication import moefy
    from neurospec.cluster.spectral import ncut, spectral_clustering, weight_graph
    from neurospec.models.loading import load_model

    loaded = load_model(args.model)
    out: dict = {"model": args.model, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}

    t = time.perf_counter()
    experts = moefy(loaded, n_experts=args.experts)
    out["moefication_s"] = round(time.perf_counter() - t, 2)
    out["moefication_layers"] = len(experts)
    out["moefication_sizes_equal"] = all(len(set(np.bincount(v).tolist())) == 1 for v in experts.values())

    t = time.perf_counter()
    pair = weight_graph(loaded, layers=[0, 1])
    labels = spectral_clustering(pair.adjacency, args.clusters, seed=0)
    out["spectral_pair_s"] = round(time.perf_counter() - t, 2)
    out["spectral_pair_edges"] = int(pair.adjacency.nnz // 2)
    out["spectral_pair_ncut"] = round(ncut(pair.adjacency, labels), 4)

    t = time.perf_counter()
    graph = weight_graph(loaded, top_k=args.top_k)
    t_graph = time.perf_counter() - t
    labels = spectral_clustering(graph.adjacency, args.clusters, seed=0)
    out["spectral_all_s"] = round(time.perf_counter() - t, 2)
    out["spectral_all_graph_s"] = round(t_graph, 2)
    out["n_neurons"] = graph.n_nodes
    out["spectral_all_edges"] = int(graph.adjacency.nnz // 2)
    out["spectral_all_excluded"] = int((labels < 0).sum())
    out["spectral_all_ncut"] = round(ncut(graph.adjacency, labels), 4)
    out["top_k"] = args.top_k

    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
