-- wrk script of the fleet scenario (bench/fleet_scenario.py): each
-- connection's requests go to <url>?k=<tag><n>, n cycling over 1..<keys>,
-- one counter per wrk thread:
--   wrk -t1 -c50 -d8s -s fleet.lua http://.../fleet -- 1000 r3-
-- With FLEET_PACE_MS=<ms> in the environment, each connection waits that
-- long after an answer before its next request (wrk's delay(): about
-- connections * 1000 / ms requests a second).  It must be decided before
-- init() runs: wrk looks for delay() in the script once, before the
-- threads start, and a delay() that returns 0 still costs a timer per
-- request.
local n = 0
local keys = 1000
local tag = ""

function init(args)
   keys = tonumber(args[1]) or 1000
   tag = args[2] or ""
   -- threads start at different places of the cycle
   n = math.random(keys) - 1
end

function request()
   n = n + 1
   if n > keys then
      n = 1
   end
   return wrk.format(nil, wrk.path .. "?k=" .. tag .. n)
end

local pace = tonumber(os.getenv("FLEET_PACE_MS") or "")
if pace and pace > 0 then
   function delay()
      return pace
   end
end
