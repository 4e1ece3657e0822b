"""Training tasks over a sampled batch subgraph, registered by name."""

from model.tasks.base import Subgraph, Task
from model.tasks.cca_ssg import CCASSGTask
from model.tasks.graphmae import GraphMAETask
from model.tasks.infonce import InfoNCETask
from model.tasks.retrieval import RetrievalTask

TASKS: dict[str, type[Task]] = {
    RetrievalTask.name: RetrievalTask,
    CCASSGTask.name: CCASSGTask,
    GraphMAETask.name: GraphMAETask,
    InfoNCETask.name: InfoNCETask,
}

__all__ = ["TASKS", "CCASSGTask", "GraphMAETask", "InfoNCETask", "RetrievalTask", "Subgraph", "Task"]
