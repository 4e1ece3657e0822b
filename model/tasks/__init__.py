"""Training tasks over a sampled batch subgraph, each with a typed config, registered by name."""

from ebrflow.model.tasks.base import Subgraph, Task
from ebrflow.model.tasks.cca_ssg import CCASSGConfig, CCASSGTask
from ebrflow.model.tasks.graphmae import GraphMAEConfig, GraphMAETask
from ebrflow.model.tasks.infonce import InfoNCEConfig, InfoNCETask
from ebrflow.model.tasks.registry import TASKS, TaskSpec, parse_tasks
from ebrflow.model.tasks.retrieval import RetrievalConfig, RetrievalTask

__all__ = [
    "TASKS",
    "CCASSGConfig",
    "CCASSGTask",
    "GraphMAEConfig",
    "GraphMAETask",
    "InfoNCEConfig",
    "InfoNCETask",
    "RetrievalConfig",
    "RetrievalTask",
    "Subgraph",
    "Task",
    "TaskSpec",
    "parse_tasks",
]
