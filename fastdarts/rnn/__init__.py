"""DARTS's recurrent cell search on word-level language modelling (RNN.md): the corpus, the search
model with its mixed op, the evaluation model, the genotype, and the search and training runs."""
