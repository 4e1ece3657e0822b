"""Training tasks over a sampled batch subgraph, registered by name."""

from ebrflow.model.tasks.base import Subgraph, Task
from ebrflow.model.tasks.cca_ssg import CCASSGTask
from ebrflow.model.tasks.graphmae import GraphMAETask
from ebrflow.model.tasks.infonce import InfoNCETask
from ebrflow.model.tasks.retrieval import RetrievalTask

TASKS: dict[str, type[Task]] = {
    RetrievalTask.name: RetrievalTask,
    CCASSGTask.name: CCASSGTask,
    GraphMAETask.name: GraphMAETask,
    InfoNCETask.name: InfoNCETask,
}

__all__ = ["TASKS", "CCASSGTask", "GraphMAETask", "InfoNCETask", "RetrievalTask", "Subgraph", "Task"]
