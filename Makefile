# Thin aliases of the scripts in launch/ (which need no make): the main job, the tests, the pins.
.PHONY: demo test constraints
demo:
	bash launch/demo.sh
test:
	bash launch/test.sh
constraints:
	bash launch/refresh_constraints.sh
