-- Argo CD health of a nanochat.io TrainingRun or EvalRun, read from the summary conditions the
-- operator writes (Ready, Stalled, Reconciling: operator/nanochat_operator/status.py, summarise).
-- Install it in argocd-cm under resource.customizations.health.nanochat.io_TrainingRun and
-- resource.customizations.health.nanochat.io_EvalRun (README, "GitOps").
local hs = {status = "Progressing", message = "waiting for the nanochat operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "waiting for the nanochat operator to observe generation " .. generation
  return hs
end

local conditions = {}
for _, c in ipairs(obj.status.conditions) do
  conditions[c.type] = c
end
local function said(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

local ready, stalled, suspended = conditions["Ready"], conditions["Stalled"], conditions["Suspended"]
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = said(ready)
elseif stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = said(stalled)
elseif suspended ~= nil and suspended.status == "True" and suspended.reason == "Suspended" then
  -- spec.suspend; a Job waiting for Kueue's admission (WaitingForQueue) is still on its way.
  hs.status = "Suspended"
  hs.message = said(suspended)
elseif ready ~= nil then
  hs.message = said(ready)
  if obj.status.step ~= nil and obj.status.totalSteps ~= nil then
    hs.message = hs.message .. " (step " .. obj.status.step .. "/" .. obj.status.totalSteps .. ")"
  end
end
return hs
