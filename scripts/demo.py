# The PyStream demo notebook (../shared/seeds/000_9ebcf8539eb818a5.txt), cell by cell, with
# only the import line changed from `pystream` to `pystream_zmq`. Runs as a plain script,
# with no `if __name__ == "__main__":` guard, the way notebook cells are pasted.
import time
from typing import Dict, List, Tuple

import cv2
import numpy as np
from tabulate import tabulate

from pystream_zmq import Pipeline, Stage

## Creating Stages

class DummyStage(Stage):
    """A dummy stage that performs some convolutions to the input 2D array,
    and count how many input it has processed.
    
    For stages in class form, the __call__ and cleanup methods have to be 
    defined, and it is recommended to define 'name' property in the stage 
    instance init
    """

    def __init__(self, name: str) -> None:
        self.count = 0
        self.name = name
        self.kernel = np.random.randint(-10, 10, size=(5, 5))

    def __call__(self, data: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        img = data["data"]
        for _ in range(100):
            img = cv2.filter2D(src=img, ddepth=-1, kernel=self.kernel)
        data["data"] = img
        self.count += 1
        return data

    def cleanup(self):
        self.count = 0

def dummy_stage_func(data: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """A function that does some convolutions to the input.
    
    This is a dummy stage defined as a function. A stage in function form only 
    takes one argument and return one result with same type"""

    img = data["data"]
    kernel = np.random.randint(-10, 10, size=(5, 5))
    for _ in range(100):
        img = cv2.filter2D(src=img, ddepth=-1, kernel=kernel)
    data["data"] = img
    return data

## Automated Pipeline

def generate_data() -> Dict[str, np.ndarray]:
    img = np.random.randint(0, 255, size=(480, 720, 3), dtype=np.uint8)
    return {"data": img}

# Cycle period for the input data
INPUT_PERIOD = 0.2
# Time to run the pipeline
ON_TIME = 5

def create_stages() -> List[DummyStage]:
    # Return 5 dummy stages
    return [DummyStage(f"Stage{i + 1}") for i in range(5)]

def create_pipeline() -> Tuple[Pipeline, List[DummyStage]]:
    # First, create the pipeline instance, we want to use the profiler
    pipeline = Pipeline(input_generator=generate_data, use_profiler=True)
    # Create the stages
    stages = create_stages()
    # Now, add the stages to the pipeline.
    for stage in stages:
        pipeline.add(stage)
    return pipeline, stages

def print_profile(latency: Dict[str, float], throughput: Dict[str, float]) -> None:
    data = []
    for k in latency.keys():
        d = [k, latency[k], throughput[k]]
        data.append(d)
    table = tabulate(data, headers=["Stage", "Latency (s)", "Throughput (d/s)"])
    print(table)

pipeline, stages = create_pipeline()
print("Starting pipeline in serial...")
pipeline.serialize()
print(f"Streaming data each {INPUT_PERIOD} s...")
pipeline.start_loop(INPUT_PERIOD)
print(f"Waiting for {ON_TIME} s...")
time.sleep(ON_TIME)
print("Stopping pipeline...")
pipeline.stop_loop()

# Let's try read the last result and do cleanup
latest = pipeline.get_results()
print()
print("Last output shape:")
print(latest["data"].shape)
print("Number of processed data:")
print(stages[-1].count)
pipeline.cleanup()
print("Pipeline has been cleaned-up")
print(f"Data counter was reset to {stages[-1].count}.")

# Get the profile
latency, throughput = pipeline.get_profiles()
print()
print("Pipeline profile:")
print_profile(latency, throughput)

pipeline, stages = create_pipeline()
print("Starting pipeline in parallel...")
pipeline.parallelize()
print(f"Streaming data each {INPUT_PERIOD} s...")
pipeline.start_loop(INPUT_PERIOD)
print(f"Waiting for {ON_TIME} s...")
time.sleep(ON_TIME)
print("Stopping pipeline...")
pipeline.stop_loop()

# Let's try read the last result and do cleanup
latest = pipeline.get_results()
print()
print("Last output shape:")
print(latest["data"].shape)
print("Number of processed data:")
print(stages[-1].count)
pipeline.cleanup()
print("Pipeline has been cleaned-up")
print(f"Data counter was reset to {stages[-1].count}.")

# Get the profile
latency, throughput = pipeline.get_profiles()
print()
print("Pipeline profile:")
print_profile(latency, throughput)

def create_pipeline() -> Pipeline:
    # First, create the pipeline instance, we want to use the profiler
    pipeline = Pipeline(input_generator=generate_data, use_profiler=True)
    # Now, add the stages to the pipeline.
    pipeline.add(DummyStage("StageA"))
    pipeline.add(DummyStage("StageB"))
    pipeline.add(dummy_stage_func)
    pipeline.add(dummy_stage_func)
    return pipeline

def print_profile(latency: Dict[str, float], throughput: Dict[str, float]) -> None:
    data = []
    for k in latency.keys():
        d = [k, latency[k], throughput[k]]
        data.append(d)
    table = tabulate(data, headers=["Stage", "Latency (s)", "Throughput (d/s)"])
    print(table)

# Times to run the pipeline
ON_CYCLE = 10

pipeline = create_pipeline()
print("Starting pipeline in parallel...")
# Wait for 5 seconds if the pipeline is not ready to take data yet when
# pushing data to the pipeline
pipeline.parallelize(block_input=True, input_timeout=10)

# Generate and forward the data for ON_CYCLE times
for _ in range(ON_CYCLE):
    data = {
        "data": np.random.randint(0, 255, size=(480, 720, 3), dtype=np.uint8)
    }
    pipeline.forward(data)
time.sleep(5)

# Let's try read the last result and do cleanup
latest = pipeline.get_results()
print()
print("Last output shape:")
print(latest["data"].shape)
pipeline.cleanup()
print("Pipeline has been cleaned-up")

# Get the profile
latency, throughput = pipeline.get_profiles()
print()
print("Pipeline profile:")
print_profile(latency, throughput)

def create_child_pipeline() -> Pipeline:
    # First, create the pipeline instance, we want to use the profiler
    pipeline = Pipeline(input_generator=generate_data, use_profiler=True)
    # Now, add the stages to the pipeline.
    pipeline.add(DummyStage("StageA"))
    pipeline.add(DummyStage("StageB"))
    return pipeline

child_pipeline = create_child_pipeline()
child_pipeline.serialize()

def create_parent_pipeline(child_pipeline: Pipeline) -> Pipeline:
    # First, create the pipeline instance, we want to use the profiler
    pipeline = Pipeline(input_generator=generate_data, use_profiler=True)
    # Now, add the stages to the pipeline. The last stage is the child pipeline.
    pipeline.add(DummyStage("Stage1"))
    pipeline.add(DummyStage("Stage2"))
    pipeline.add(child_pipeline.as_stage(), "ChildPipeline")
    return pipeline

parent_pipeline = create_parent_pipeline(child_pipeline)
parent_pipeline.parallelize(block_input=True)

# Generate and forward the data for ON_CYCLE times
ON_CYCLE = 10
for _ in range(ON_CYCLE):
    data = {
        "data": np.random.randint(0, 255, size=(480, 720, 3), dtype=np.uint8)
    }
    parent_pipeline.forward(data)
time.sleep(5)

# Let's try read the last result and do cleanup
latest = parent_pipeline.get_results()
print()
print("Last output shape:")
print(latest["data"].shape)
parent_pipeline.cleanup()
print("Pipeline has been cleaned-up")

# Get the profile
latency, throughput = parent_pipeline.get_profiles()
print()
print("Pipeline profile:")
print_profile(latency, throughput)
