from .base import Search

class BayesSearch(Search):
    name = "bayes"
