/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * What the programs share with Go: the constants and the verdict enum
 * (consts.h) and every struct the maps hold (structs.h). bpf2go generates the
 * Go side of the types gen.go names with -type (bpf.XnetVerdict,
 * bpf.XnetHostConfig, ...) from the BTF of xnet.c, which includes this.
 */
#ifndef XNET_H
#define XNET_H

#include "consts.h"
#include "structs.h"

#endif /* XNET_H */
