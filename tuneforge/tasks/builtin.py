"""tuneforge's own tasks: importing this module registers them."""

from tuneforge.tasks.causal_lm import CausalLMTask
from tuneforge.tasks.classification import ClassificationTask
from tuneforge.tasks.detection import DetectionTask
from tuneforge.tasks.generation import CaptioningTask, Seq2SeqTask
from tuneforge.tasks.multilabel import MultiLabelTask
from tuneforge.tasks.qa import QATask
from tuneforge.tasks.regression import RegressionTask
from tuneforge.tasks.segmentation import SegmentationTask

BUILTIN_TASKS = (ClassificationTask, MultiLabelTask, RegressionTask, SegmentationTask, DetectionTask, Seq2SeqTask,
                 CaptioningTask, CausalLMTask, QATask)
