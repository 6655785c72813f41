"""Complete verification by branch and bound around auto_LiRPA's bounding step.

relu_step: bounds a batch of ReLU-split domains (alpha-CROWN with beta-CROWN split constraints).
branching: which neuron of a domain to split. relu_search: the ReLU-split search of one tree.
input_search: the input-split search for low-dimensional inputs. outcome: what a search answers.
"""
