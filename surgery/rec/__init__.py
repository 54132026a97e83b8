"""Sequential recommendation: data, metrics, baselines, the LLM recommender, SLMRec and DLLM2Rec distillation.

Modules: `data` (MovieLens-format interactions -> 5-core, time-ordered, leave-one-out splits on disk), `metrics`
(HR@k, NDCG@k, MRR under full ranking or 1 positive + N sampled negatives), `models` (SASRec, GRU4Rec), `llm`
(item embeddings fed to a causal-LM backbone), `train` (the shared training loop, checkpoints, events), `distill`
(SLMRec: a shallow student trained on a deep teacher's block-boundary hidden states), `dllm2rec` (DLLM2Rec: an LLM
recommender's rankings and item embeddings distilled into SASRec / GRU4Rec) with `teacher_cache` (the teacher's
rankings, computed once), `store` (saving and loading any rec model directory).
"""
