from cowfs.client import launch

launch()
