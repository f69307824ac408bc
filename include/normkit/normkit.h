#pragma once
// Everything normkit offers, in one include.
#include "normkit/batch_norm.h"
#include "normkit/batch_norm_steps.h"
#include "normkit/context.h"
#include "normkit/error.h"
#include "normkit/fold_batch_norm.h"
#include "normkit/group_norm.h"
#include "normkit/instance_norm.h"
#include "normkit/layer_norm.h"
#include "normkit/rms_norm.h"
#include "normkit/layers.h"
#include "normkit/tensor.h"
