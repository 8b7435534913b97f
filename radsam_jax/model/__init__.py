from radsam_jax.model.config import ModelConfig, load_model_config
from radsam_jax.model.sam import RadSam, Sam, abstract_variables, init_variables

__all__ = ["ModelConfig", "RadSam", "Sam", "abstract_variables", "init_variables", "load_model_config"]
